# Filters two dependency warnings that say nothing about a run (see _quiet.py), before anything logs.
from ._quiet import quiet_dependency_warnings

quiet_dependency_warnings()
