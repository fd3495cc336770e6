"""The harness: what makes the bake-off a reproducible experiment, one way below run.py.

    cli.py          run.py's flags, the checks before any work, Ctrl-C and SIGTERM
    protocol.py     the protocol's numbers, named once (run.py and the report read them)
    trainings.py    the data a run trains on, its trainings, checkpoints reused, the judge
    checkpoints.py  a trained model with its settings, written atomically
    cells.py        the sweep's kept scores: anomaly-only trainings scored as they finish
    workers.py      trainings in worker processes, the status line, the machine's record
    figures.py      the figures and GIFs beside REPORT.md; the atomic write every file uses
    report.py       the audit of the article's claims and REPORT.md, from results.json alone:
                    `python -m harness.report results/mnist`
    bench.py        benchmarks: `python -m harness.bench --only train|jobs|umap|gmm|probe`
    test_harness.py their tests

Imports go one way: run.py uses the harness, the harness uses the course modules (mnist.py,
ae.py, tasks.py, umap_lite.py), and nothing here imports run.py. A student never needs this
folder to learn how the autoencoders work.
"""
