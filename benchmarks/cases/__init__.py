"""Benchmark cases, one module per op family. Each module defines
`CASES: dict[str, Callable[[int], list[Case]]]` mapping an op name to a builder that takes the
token count and returns that op's cases."""
