"""Files in and out: atomic writes and digests (:mod:`exits.io.files`), JSON read as a
stream (:mod:`exits.io.json_stream`), Parquet rows read by row group (:mod:`exits.io.parquet_rows`)."""
from exits.io.files import (atomic_open, atomic_path, file_digest, format_os_error, read_json_if_exists, write_bytes,
                             write_json)

__all__ = ["atomic_open", "atomic_path", "file_digest", "format_os_error", "read_json_if_exists", "write_bytes", "write_json"]
