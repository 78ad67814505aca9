"""The application: the `asft-trl` command line (`cli`), the training script it launches (`train`, also
`accelerate launch -m asft_trl.scripts.train`), the end-of-run report (`summary`) and the two studies (`study`,
`study_knowledge`). Everything else in the package is a library these use; nothing outside `scripts` imports them.
"""
