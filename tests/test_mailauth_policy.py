"""The policy after the checks, as a table: DMARC enforcement with pct (an injected RNG), the
SPF-fail option, and temperror never refusing."""

from __future__ import annotations

import random

import pytest

from mailsrv.mailauth.policy import QUARANTINE_HEADERS, InboundPolicy
from mailsrv.mailauth.verdict import ARCResult, DMARCResult, SPFResult, Verdict
from mailsrv.smtp import replies


class Draw(random.Random):
    """An RNG whose every draw is ``value`` (pct sampling: selected when value * 100 < pct)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def verdict(dmarc: str, policy: str = "reject", pct: int = 100, spf: str = "pass") -> Verdict:
    return Verdict(
        SPFResult(spf, "sender.test"),
        SPFResult("none"),
        (),
        DMARCResult(dmarc, "example.test", policy, pct),
        ARCResult("none"),
    )


DELIVER = ("none", None, b"")
REFUSE = ("reject", replies.DMARC_REJECTED, b"")
MARK = ("quarantine", None, QUARANTINE_HEADERS)
CASES = [
    # enforce, spf_reject, verdict, draw, (disposition, refusal, headers)
    ("pass is delivered", True, False, verdict("pass"), 0.5, ("none", None, b"")),
    (
        "reject, enforcing",
        True,
        False,
        verdict("fail"),
        0.5,
        ("reject", replies.DMARC_REJECTED, b""),
    ),
    ("reject, not enforcing", False, False, verdict("fail"), 0.5, ("none", None, b"")),
    (
        "quarantine, enforcing",
        True,
        False,
        verdict("fail", "quarantine"),
        0.5,
        ("quarantine", None, QUARANTINE_HEADERS),
    ),
    ("policy none", True, False, verdict("fail", "none"), 0.5, ("none", None, b"")),
    (
        "reject, pct=0: the next less strict policy",
        True,
        False,
        verdict("fail", pct=0),
        0.0,
        ("quarantine", None, QUARANTINE_HEADERS),
    ),
    (
        "reject, pct=50, sampled in",
        True,
        False,
        verdict("fail", pct=50),
        0.49,
        ("reject", replies.DMARC_REJECTED, b""),
    ),
    (
        "reject, pct=50, sampled out",
        True,
        False,
        verdict("fail", pct=50),
        0.5,
        ("quarantine", None, QUARANTINE_HEADERS),
    ),
    (
        "quarantine, pct=50, sampled out",
        True,
        False,
        verdict("fail", "quarantine", pct=50),
        0.9,
        ("none", None, b""),
    ),
    (
        "temperror never refuses",
        True,
        True,
        verdict("temperror", spf="temperror"),
        0.0,
        ("none", None, b""),
    ),
    ("permerror never refuses", True, False, verdict("permerror", ""), 0.0, ("none", None, b"")),
    (
        "SPF fail alone: DMARC decides",
        False,
        False,
        verdict("pass", spf="fail"),
        0.5,
        ("none", None, b""),
    ),
    (
        "SPF fail refused when asked",
        False,
        True,
        verdict("pass", spf="fail"),
        0.5,
        ("none", replies.SPF_REJECTED, b""),
    ),
    (
        "SPF softfail is no fail",
        False,
        True,
        verdict("pass", spf="softfail"),
        0.5,
        ("none", None, b""),
    ),
]


@pytest.mark.parametrize(
    ("enforce", "spf_reject", "checked", "draw", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decisions(
    enforce: bool,
    spf_reject: bool,
    checked: Verdict,
    draw: float,
    expected: tuple[str, replies.Reply | None, bytes],
) -> None:
    decision = InboundPolicy(enforce, spf_reject, Draw(draw)).decide(checked)
    disposition, refusal, headers = expected
    assert decision.verdict.dmarc.disposition == disposition
    assert decision.headers == headers
    if refusal is None:
        assert decision.refusal is None
    else:
        assert decision.refusal is not None
        assert (decision.refusal.code, decision.refusal.enhanced) == (
            refusal.code,
            refusal.enhanced,
        )


def test_refusals_name_the_domain() -> None:
    policy = InboundPolicy(True, True, Draw(0.0))
    dmarc = policy.decide(verdict("fail"))
    assert dmarc.refusal is not None
    assert (
        dmarc.refusal.format()
        == b"550 5.7.1 Message refused by the DMARC policy of example.test\r\n"
    )
    spf = policy.decide(verdict("pass", spf="fail"))
    assert spf.refusal is not None
    assert spf.refusal.format() == b"550 5.7.23 SPF check failed for sender.test\r\n"


def test_pct_draws_only_for_sampled_failures() -> None:
    draws: list[float] = []

    class Counting(random.Random):
        def random(self) -> float:
            draws.append(0.0)
            return 0.0

    policy = InboundPolicy(True, False, Counting(0))
    for checked in (verdict("pass", pct=50), verdict("fail"), verdict("fail", pct=50)):
        policy.decide(checked)
    assert len(draws) == 1
