"""What a converter did to each normalization layer of a model, as a table a user can print.

:func:`~normmatters.convert_norms` returns a :class:`ConversionReport` with ``report=True``: one
row per norm-like module (a module shared by several parents is one row naming every path), what
it became or why it was left, and how many modules were passed over without a probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ConversionReport", "ConversionRow"]


@dataclass
class ConversionRow:
    """One module: its paths in the model, its class, the outcome and the detail.

    :ivar outcome: ``"converted"``, ``"left"`` (with a warning) or ``"kept"`` (a family not asked for).
    :ivar became: the replacement's class and configuration (converted), or why it was left / kept.
    """

    paths: list[str]
    cls: str
    outcome: str
    became: str

    @property
    def path(self) -> str:
        return ", ".join(self.paths)


@dataclass
class ConversionReport:
    """The rows of one conversion, the number of modules skipped without a probe, and its time."""

    rows: list[ConversionRow] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0

    @property
    def converted(self) -> list[ConversionRow]:
        return [r for r in self.rows if r.outcome == "converted"]

    @property
    def left(self) -> list[ConversionRow]:
        return [r for r in self.rows if r.outcome == "left"]

    def summary(self) -> str:
        kept = sum(r.outcome == "kept" for r in self.rows)
        return (f"{len(self.converted)} converted, {len(self.left)} left" + (f", {kept} kept" if kept else "")
                + f"; {self.skipped} other modules passed over without a probe; {self.seconds:.3f} s")

    def table(self, width: int = 60) -> str:
        """The rows as a plain-text table (paths and details cut to ``width`` characters)."""

        def cut(s: str) -> str:
            return s if len(s) <= width else s[: width - 1] + "…"

        head = ("path", "class", "outcome", "became / why")
        body = [(cut(r.path), r.cls, r.outcome, r.became) for r in self.rows]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] for row in [head, *body]]
        lines.insert(1, "-" * min(max(len(s) for s in lines), 160))
        return "\n".join(lines + [self.summary()])

    def __str__(self) -> str:
        return self.table()
