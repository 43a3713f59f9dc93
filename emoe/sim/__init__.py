"""The SimPy world: GPU memory, the PCIe link and the compute cost model, driving emoe.core."""
