"""The cascade engine: one request walked through a cascade's nodes by its policy, the
policy files it reloads, explored requests as traces, and what a run leaves in the ledger."""
