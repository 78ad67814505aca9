"""The studies of docs/study.md: experiments run with the package, not part of it (nothing in `asft_trl` imports them).

Run one as `python -m studies.<name>`; `python -m studies.mcq --help` lists its options.
"""
