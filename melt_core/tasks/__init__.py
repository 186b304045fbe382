"""Synthetic tasks melt generates itself, offline and seeded."""

from .chains import ChainTask, Problem, make_problems, write_problems

__all__ = ["ChainTask", "Problem", "make_problems", "write_problems"]
