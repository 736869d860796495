from exits.progress import Eta, format_duration


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 187, 7500)] == ["0s", "42s", "3m07s", "2h05m"]


def test_eta_from_the_rate_of_this_process_only():
    now = [100.0]
    eta = Eta(total=10, done_before=4, clock=lambda: now[0])  # resumed after 4 epochs
    assert eta.remaining(4) is None and "ETA ?" in eta.describe(4)
    now[0] += 30.0  # 2 epochs of this process in 30 s -> 15 s each, 4 left
    assert eta.remaining(6) == 60.0
    assert eta.describe(6) == "6/10, 30s elapsed, ETA 1m00s"
    assert eta.remaining(10) == 0.0
