"""A restoration run, from the user's call to the summary next to the data.

- ``restore.py``: :func:`restore` (one volume) and :func:`predict` (an in-memory array);
- ``batch.py``: :func:`restore_many`, many volumes as one queue;
- ``volume.py``: one volume's run: plan (writes nothing), start (outputs, done markers), finish;
- ``queue.py``: every block of every run through the task runner;
- ``results.py``: :class:`RunResult` and the summaries written next to the outputs.
"""
