"""Moved to ``ibmd_fast.restore`` (the one place a restoration chain runs); importable from here for
one release."""
from ibmd_fast.restore import default_teacher_nfe, sample_student, sample_teacher, valid_teacher_nfe
from ibmd_fast.train.report import compare

__all__ = ["default_teacher_nfe", "valid_teacher_nfe", "sample_teacher", "sample_student", "compare"]
