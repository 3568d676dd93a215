"""pipelines.runtime.side_by_side: set-up steps run at once, results in order, errors handed to the caller."""
import threading

import pytest

from otc_ray.pipelines.runtime import side_by_side


def test_tasks_run_at_once_and_return_in_order():
    a_started, b_started = threading.Event(), threading.Event()

    def a():
        a_started.set()
        assert b_started.wait(10), "b never ran while a was running"
        return "a"

    def b():
        b_started.set()
        assert a_started.wait(10), "a never ran while b was running"
        return "b"

    assert side_by_side(a, b) == ["a", "b"]


def test_the_first_error_in_order_is_raised_after_all_have_ended():
    ended = threading.Event()

    def slow_ok():
        ended.wait(0.2)
        ended.set()
        return 1

    def fails_first():
        raise ValueError("first")

    def fails_second():
        raise KeyError("second")

    with pytest.raises(ValueError, match="first"):
        side_by_side(fails_first, slow_ok, fails_second)
    assert ended.is_set()
