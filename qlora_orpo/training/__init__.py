"""Training: the ORPO loss, the memory-aware step, the loop, checkpoints, resume, metrics, ranks.

``loss`` is pure tensor maths; ``step`` runs forward and backward of one micro-batch
(joint, split or sequential), ``step_choice`` picks among them; ``loop`` runs optimizer
steps and takes evaluation and the checkpoint policy as hooks; ``checkpoint``, ``resume``
and ``metrics`` keep what a run writes; ``distributed`` and ``sharded_state`` cover DDP
and FSDP2. Imports ``core``, ``config``, ``models`` and ``data``; never ``evaluation`` or
``export``.
"""
