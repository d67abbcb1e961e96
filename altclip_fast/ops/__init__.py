"""The operations the model runs, behind one interface, with a torch backend and a Triton backend."""
