"""Generic episodic training of a trainable method on a SOURCE dataset.

- :mod:`nagl.training.batch` - what a method asks of an episode (:class:`BatchSpec`)
  and what its ``loss`` receives (:class:`EpisodeBatch`);
- :mod:`nagl.training.episodes` - source pools, the validation split, episode
  samplers and the feature store over the feature cache;
- :mod:`nagl.training.schedule` - epochs, optimiser settings, checkpoint selection
  (the training profiles);
- :mod:`nagl.training.selection` - checkpoint selection by the image AUROC of
  held-out source images (``select = "auroc"``);
- :mod:`nagl.training.loop` - the loop: optimiser, schedule, selection, timing,
  metadata, checkpoint.

The method owns its loss and hyper-parameters (``nagl/methods/<name>.py``); see
:class:`nagl.methods.base.TrainableMethod`. This ``__init__`` imports nothing, so
a method module can import :mod:`nagl.training.batch` without a cycle.
"""
