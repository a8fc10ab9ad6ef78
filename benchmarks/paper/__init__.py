"""The pieces of benchmarks/paper_table.py (the paper's experiment at our scale), one job per module.

- ``config``: the scales (``Preset``, ``PRESETS``), the tasks (``Task``, ``TASKS``) and the rows each
  task evaluates, the work counts and the time estimate;
- ``stages``: resumable stages (``Stages``) and the training stages (classifier, teachers, students);
- ``measure``: restoring the evaluation images for one row and keeping what every interval needs
  (per-image PSNR, SSIM, correctness, classifier features);
- ``summary``: intervals, the per-(task, student NFE) summary and the target checks;
- ``report``: Markdown, the labelled picture grids and the FID-vs-time plot (matplotlib).

The modules are imported as ``paper.<name>`` with benchmarks/ on ``sys.path`` (paper_table.py puts it
there).
"""
