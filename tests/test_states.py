import pytest

from fastrl.monitor.states import STATES, classify, state_fractions

CALL = '<tool_call>\n{"name": "cd", "arguments": {"folder": "a"}}\n</tool_call>'


@pytest.mark.parametrize(
    "text, fmt, state",
    [
        (CALL, "hermes", "healthy_call"),
        (CALL + "\n" + CALL, "hermes", "healthy_call"),
        ("  " + CALL + "\n", "hermes", "healthy_call"),
        ("The file is moved.", "hermes", "healthy_text"),
        ("Sure! " + CALL, "hermes", "pollution"),  # stray text around the call
        (CALL + " What is Rosa's balance?", "hermes", "pollution"),  # an echo after the call
        ('<tool_call>\n{"name": "cd", "arguments": ', "hermes", "pollution"),  # never closed
        ("<tool_call>\nnot json\n</tool_call>", "hermes", "pollution"),
        ("Done <tool_response> x", "hermes", "pollution"),  # control tags inside text
        ("", "hermes", "collapse"),
        ("   \n", "hermes", "collapse"),
        ("<tool_call>", "hermes", "collapse"),  # opened, then the turn ended
        ("<tool_call>\n</tool_call>", "hermes", "collapse"),
        ("[cd(folder='a')]", "pythonic", "healthy_call"),
        ("[cd(folder=open('x'))]", "pythonic", "pollution"),
        ("Moved it.", "pythonic", "healthy_text"),
        (CALL, "pythonic", "pollution"),  # the other syntax's tags
    ],
)
def test_classify(text, fmt, state):
    assert classify(text, fmt) == state


def test_state_fractions():
    fr = state_fractions(["healthy_call", "healthy_call", "collapse", "pollution"])
    assert set(fr) == {f"state/{s}" for s in STATES}
    assert fr["state/healthy_call"] == 0.5 and fr["state/healthy_text"] == 0.0
    assert sum(fr.values()) == pytest.approx(1.0)
    assert state_fractions([]) == {f"state/{s}": 0.0 for s in STATES}
