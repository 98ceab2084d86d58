//! The sandbox: fake Healthie, IntakeQ and Hint servers faithful to the reference, a synthetic
//! population with ground truth, and a sender of correctly signed webhooks.

pub mod hint;
pub mod intakeq;
