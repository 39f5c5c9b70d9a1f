"""On top of the pipeline: the embedded demos (demo: classification, demo_lm: causal LM), the speed bench
(bench) and the evidence study's summary they print (evidence)."""
