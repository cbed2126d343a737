"""Built-in ``train`` stages, each runner next to its params: pairs (:mod:`.pair_trainer`, REBEL, DPO and the
reward model in :mod:`.preference`, IPO/SimPO/ORPO/SFT/KTO in :mod:`.offline`), SFT (:mod:`.sft`), KTO
(:mod:`.unpaired`), reward models (:mod:`.reward_model`) and online RL (:mod:`.online`)."""
