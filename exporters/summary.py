"""What an export wrote and what it skipped, with reasons: printed at the end, saved as JSON."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: How many examples to keep per skip reason.
MAX_EXAMPLES = 5


@dataclass
class ExportSummary:
    """Counts of exported items and of skipped ones by reason (each with a few examples)."""

    format: str
    exported: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        """Add ``n`` to an exported counter (``images``, ``annotations``, ``refs`` ...)."""
        self.exported[what] += n

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Record one skipped item under a fixed ``reason``, with where it was and the specifics."""
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(f"{where}: {detail}" if detail else where)

    def note(self, text: str) -> None:
        """A remark that is not a skip (e.g. which annotation won, what was assumed)."""
        if text not in self.notes:
            self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON."""
        return {
            "format": self.format,
            "exported": dict(self.exported),
            "skipped": {
                reason: {"count": n, "examples": self.examples.get(reason, [])}
                for reason, n in sorted(self.skipped.items())
            },
            "splits": self.splits,
            "notes": self.notes,
        }

    def write(self, out_dir: str | Path) -> Path:
        """Write ``export_summary.json`` into ``out_dir``."""
        path = Path(out_dir) / "export_summary.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def format_text(self) -> str:
        """A short human-readable report."""
        lines = [f"export ({self.format}):"]
        for what, n in self.exported.items():
            lines.append(f"  {what:<28} {n}")
        for split, counts in self.splits.items():
            parts = ", ".join(f"{k} {v}" for k, v in counts.items())
            lines.append(f"  split {split:<22} {parts}")
        if self.skipped:
            lines.append("skipped:")
            for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
                lines.append(f"  {reason:<40} {n}")
                for example in self.examples.get(reason, [])[:2]:
                    lines.append(f"      e.g. {example}")
        else:
            lines.append("skipped: nothing")
        for text in self.notes:
            lines.append(f"note: {text}")
        return "\n".join(lines)
