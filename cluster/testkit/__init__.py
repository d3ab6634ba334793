"""The test kit: everything that starts, breaks and judges a cluster.

A local cluster of real processes (`launcher`), the travel-booking saga and its four
participants (`travel`, `booking`: `saga-participant` with fault knobs), the fault
harness (`faults`) and the seeded chaos run (`chaos`), the global checker
(`checker`), the demo (`demo`), and the `sagactl` commands that use them
(`commands`). Production code never imports it.
"""
