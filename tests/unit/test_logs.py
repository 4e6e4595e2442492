"""Log routing: information to stdout, warnings (a damaged checkpoint named, a fallback) to stderr
like the CLI's errors; other ranks only when a record asks for every rank."""

import logging

from megatron_lite.logs import setup_logging


def test_warnings_go_to_stderr_and_information_to_stdout(capsys):
    log = logging.getLogger("megatron_lite.test")
    setup_logging(0)
    log.info("step 1 | loss 4.2")
    log.warning("warning: step_00000004 does not verify; falling back to step_00000002")
    out, err = capsys.readouterr()
    assert out == "step 1 | loss 4.2\n"
    assert err == "warning: step_00000004 does not verify; falling back to step_00000002\n"
    setup_logging(1)  # a second call replaces the handlers (no doubled lines)
    log.info("rank 1 says nothing")
    log.warning("only rank 0 warns")
    log.warning("every rank warns", extra={"all_ranks": True})
    out, err = capsys.readouterr()
    assert out == "" and err == "[rank 1] every rank warns\n"
