"""Pure geometry: how a volume is cut into blocks whose predictions equal the whole-volume one.

- ``plan.py``: :class:`Block` (write region, read region, window, crop) and :class:`BlockPlan`;
- ``sizing.py``: the default block and tile sizes, from the halo, the device and the cluster;
- ``layout.py``: :class:`AxisLayout`, the volume's axes in the predictor's order;
- ``zoom.py``: node-aligned upsampling along an axis (isotropic restoration's Z grid).

Nothing here reads or writes data.
"""
