"""The progress bars of the eval metrics: `linearize.progress`, under the name eval code imports."""
from ..progress import bar, progress_bars, shown

__all__ = ["bar", "progress_bars", "shown"]
