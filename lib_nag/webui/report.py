"""What NAG did in a job, per sampling pass, and the one console line that says so."""

from __future__ import annotations

from dataclasses import dataclass, field

CONSOLE_PREFIX = "[NAG]"
UNPLACED = "another extension calls the UNet with its own batches, tiles or row order"


@dataclass
class PassReport:
    """What NAG did in one sampling pass: ``guided`` holds the steps in which it guided at least one
    call (a cross-attention call, or a model call where NAG runs the whole model: ``unit``). Of the
    ``calls`` inside the window, ``placed`` count those whose rows were matched to the CFG batch and
    carry a positive prompt, ``unplaced`` those whose rows could not be matched. ``hooked`` says what
    NAG hooked."""

    is_hires: bool
    steps: int = 0
    window: int = 0
    guided: set[int] = field(default_factory=set)
    guided_calls: int = 0
    calls: int = 0
    placed: int = 0
    unplaced: int = 0
    layers: int = 0
    hooked: str = ""
    unit: str = "cross-attention calls"
    skipped: str = ""
    sigma_stop: str = ""  # where NAG sigma end ended guidance in this pass
    why_unplaced: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return "hires pass" if self.is_hires else "first pass"

    def summary(self) -> str:
        calls = "; ".join(filter(None, (f"{self.guided_calls} {self.unit}", self.sigma_stop)))
        return f"{self.name} {len(self.guided)}/{self.steps} steps guided ({calls})"

    def count_call(self, placed: bool, positive: bool, why: str = "") -> None:
        """Count a call inside the window; ``why`` a call was not placed, if not for the rows."""
        self.calls += 1
        self.placed += placed and positive
        self.unplaced += not placed
        if not placed:
            self.why_unplaced.add(why or UNPLACED)


@dataclass
class JobReport:
    """What NAG did in one job, over all its batches; printed as one console line."""

    model: str = ""
    passes: dict[bool, PassReport] = field(default_factory=dict)
    error: str = ""

    def pass_report(self, is_hires: bool) -> PassReport:
        return self.passes.setdefault(is_hires, PassReport(is_hires))

    def guided_calls(self) -> int:
        return sum(p.guided_calls for p in self.passes.values())

    def line(self) -> str:
        if self.error:
            return f"{CONSOLE_PREFIX} invalid arguments, job stopped: {self.error}"
        ran = [p for p in self.passes.values() if not p.skipped]
        if not ran:
            reasons = sorted({p.skipped for p in self.passes.values()}) or ["no sampling pass ran"]
            return f"{CONSOLE_PREFIX} skipped: {'; '.join(reasons)}"
        if not self.guided_calls():
            return f"{CONSOLE_PREFIX} not applied on {self.model}: {self.not_applied_reason(ran)}"
        parts = [p.summary() for p in ran]
        hooked = ran[-1].hooked or f"{max(p.layers for p in ran)} cross-attention layers hooked"
        line = f"{CONSOLE_PREFIX} active on {self.model}: {', '.join(parts)}, {hooked}"
        unplaced = sum(p.unplaced for p in ran)
        if unplaced:
            line += f"; {unplaced} of {unplaced + sum(p.placed for p in ran)} calls not guided ({why_unplaced(ran)})"
        return line

    @staticmethod
    def not_applied_reason(ran: list[PassReport]) -> str:
        placed, unplaced = sum(p.placed for p in ran), sum(p.unplaced for p in ran)
        if unplaced:
            return f"{placed} of {placed + unplaced} {ran[-1].unit} could be placed in the CFG batch ({why_unplaced(ran)})"
        if not any(p.window for p in ran):
            return "no sampling step fell inside the NAG start/end window"
        if not any(p.guided for p in ran) and all(p.sigma_stop for p in ran):
            return "no sampling step inside the window had σ at or above NAG sigma end (" + "; ".join(p.sigma_stop for p in ran) + ")"
        if not any(p.calls for p in ran):
            return "no hooked cross-attention layer ran (a UNet replacement such as TensorRT bypasses them)"
        return "no cross-attention call carried a positive prompt"


def why_unplaced(passes: list[PassReport]) -> str:
    return "; ".join(sorted(set().union(*(p.why_unplaced for p in passes))))
