"""The restart policy of dev's parts (the processes themselves are tested through `comfyui-gateway dev`)."""

from __future__ import annotations

from app.child_processes import RestartBackoff


def test_restarts_back_off_while_a_part_keeps_dying_and_start_over_once_it_ran_fine() -> None:
    backoff = RestartBackoff()
    assert [backoff.delay_after_exit(ran_for=2) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay_after_exit(ran_for=RestartBackoff.RAN_FINE_AFTER) == 1
    assert backoff.delay_after_exit(ran_for=2) == 2
