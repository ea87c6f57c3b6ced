"""segue-dist: Segue unlearnable examples for face privacy, at corpus scale."""

__version__ = "0.1.0"
