"""Performance benchmarks: every number is a ratio against a baseline measured in the same run, on the same machine.

``python -m benchmarks`` (``make bench``) prints one table; ``--quick`` runs reduced sizes in a few minutes;
``--only a,c`` picks sections. Sections (issue #6):

a. data generation per sample: our pipeline (fast engine) against plain abTEM simulating the same scenes from scratch,
   with the accuracy of ours against plain (``generation``);
b. one extra imaging condition against one exit-wave simulation (``generation``);
c. our time per multislice slice against the FFTs a slice needs on the same grid (``generation``);
d. the training input pipeline against the rate the models consume and against a folder of .npy files
   (``training``);
e. epoch time with and without MLflow logging and the OOD callback, at the demo's sizes (``training``);
f. throughput of the demo sweep with 2 workers against 1, real ``sweep`` commands on fresh stores (``sweeps``).
g. scale-out: generation on a Dask cluster with 2 workers against 1 and its content hash against a local run's; the
   demo sweep with its claims in PostgreSQL, 2 workers against 1 (``scaleout``, services from ``services``).

Timings are medians (or minima, for micro-benchmarks) of repeated runs; the machine may be shared, so the baseline of
every ratio is measured next to what it is compared with.
"""
