"""The training loops every trainer shares: the accelerate core (:mod:`.trainer`: optimizer, micro-steps,
checkpoint/resume, cross-process averaging, trackers), saving a trained model (:mod:`.save`) and the
online RL loop (:mod:`.online_loop`). Loops use :mod:`rlhf_spec.algorithms` and the bottom layer
(records, context, runtime); they import no stage, reward or backend."""
