"""Mirrors scripts/xyz_grid.py (v1.10.1): the axis registry other extensions extend. The host
loads this file under the module name ``xyz_grid.py`` and lists its Script in scripts_data."""

from modules import scripts


def boolean_choice(reverse=False):
    """Mirrors xyz_grid.boolean_choice."""
    return lambda: ["False", "True"] if reverse else ["True", "False"]


class AxisOption:
    """Mirrors xyz_grid.AxisOption (the fields an axis carries)."""

    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
        self.confirm, self.cost, self.choices, self.prepare = confirm, cost, choices, prepare


axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None)]


class Script(scripts.Script):
    """Mirrors xyz_grid.Script: only its identity matters here."""

    def title(self):
        return "X/Y/Z plot"
