"""The training loops every trainer shares: the accelerate core (:mod:`.core`: optimizer, micro-steps,
checkpoint/resume (:mod:`.checkpoint`), cross-process averaging, trackers) with the row-index trainer on it
(:mod:`.trainer`), saving a trained model (:mod:`.save`), the experience maker (:mod:`.experience`) and the
online RL loop (:mod:`.online_loop`). Loops use :mod:`rlhf_spec.algorithms` and the bottom layer
(records, errors, runtime); they import no stage, reward or backend."""
