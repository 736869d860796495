"""exits: extreme points to instance masks."""
__version__ = "0.1.0"
