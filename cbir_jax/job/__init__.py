"""The extraction job's stages: plan -> run the steps -> assemble rows into shards -> finish.

`cbir_jax.extract.run` composes them; each module here is one stage or one record it uses.
"""
