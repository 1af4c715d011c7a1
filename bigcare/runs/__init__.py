"""A restoration run, from the user's call to the summary next to the data.

- ``restore.py``: :func:`restore` (one volume) and :func:`predict` (an in-memory array);
- ``batch.py``: :func:`restore_many`, many volumes as one queue;
- ``volume.py``: one volume's run: plan (writes nothing), start (outputs, done markers), finish;
- ``outputs.py``: the output images, their geometry and done markers; the input's fingerprint;
- ``dryrun.py``, ``info.py``, ``preview.py``, ``tiff.py``: bigcare plan, bigcare info, --preview, TIFF in and out;
- ``queue.py``: every block of every run through the task runner;
- ``results.py``: :class:`RunResult` and the summaries written next to the outputs;
- ``calibrate.py``: bigcare calibrate (coverage, ECE and the recalibration of probabilistic models).
"""
