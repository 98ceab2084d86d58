-- Admin tools: `patient show` reads a patient's link history by either side of the move.

CREATE INDEX link_events_patient ON link_events (patient_id);
CREATE INDEX link_events_previous_patient ON link_events (previous_patient_id);
