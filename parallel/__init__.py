"""How a model is split over ranks. Read registry.py first: every strategy by name, its apply_*
function (strategies/, one module each) and its traits; mesh.py owns the degrees and the
DeviceMesh; costs.py is each strategy's memory and communication model; layout.py what a rank
holds; distenv.py and loopback.py the process group; optim.py the optimizer every strategy builds."""
