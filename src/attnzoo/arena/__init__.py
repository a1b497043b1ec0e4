"""The arena: benchmark suites (speed/memory, fidelity), the SQLite results store and the report."""
