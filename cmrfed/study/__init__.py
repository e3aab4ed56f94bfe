"""``cmrfed study``: a declared, resumable grid of federated runs and its report.

config.py reads the study file, plan.py lays out the cells, runner.py runs them through the
same federate / evaluate / compare functions, report/ writes STUDY/report/. The study files
cmrfed ships are :mod:`cmrfed.templates`.
"""
