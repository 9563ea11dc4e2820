"""Training: DDPM (``ddpm``), rectified flows and reflow (``rectified_flow``, ``pairs``), and AMED predictors
distilled from a finer teacher (``amed``); the pieces of AMED training are public for experiments on it."""

from diffsamp.training.amed import AmedTrainOptions, student_grids, student_step, teacher_targets, train_amed

__all__ = ["AmedTrainOptions", "student_grids", "student_step", "teacher_targets", "train_amed"]
