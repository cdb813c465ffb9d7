"""Protein structures: reading and writing files, geometry, DSSP and SASA features, all-atom frames."""
