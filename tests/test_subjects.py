import pytest

from common import subjects


def test_subject_names():
    assert subjects.request("w0") == "sy.req.w0"
    assert subjects.tokens("abc-1") == "sy.tok.abc-1"
    assert subjects.cancel("abc_1") == "sy.cancel.abc_1"
    assert subjects.kv_events("w1") == "sy.kv.w1"
    assert subjects.heartbeat("w1") == "sy.hb.w1"
    assert subjects.ALL_HEARTBEATS == "sy.hb.*" and subjects.ALL_KV_EVENTS == "sy.kv.*"
    assert subjects.ALL_CANCELS == "sy.cancel.*"
    assert subjects.last_token(subjects.heartbeat("w7")) == "w7"


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "*", ">", "x" * 65, "a\nb"])
def test_ids_that_would_escape_their_subject_are_refused(bad):
    with pytest.raises(ValueError, match="request id"):
        subjects.tokens(bad)
