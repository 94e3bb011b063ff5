//! The kubernetes-mig checkpoint format.
