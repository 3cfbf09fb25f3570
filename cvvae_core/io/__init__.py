"""Files: weight files (:mod:`.files`), the diffusers <-> LDM name table (:mod:`.keymap`), the
architecture read from shapes (:mod:`.architecture`), CV-VAE checkpoints in the official layouts
(:mod:`.checkpoint`), image VAE files (:mod:`.image_vae_file`), the built-in weights
(:mod:`.builtin`) and the one video reader (:mod:`.video`)."""
