-- One database per service (ARCHITECTURE.md §1); the gateway's platform database holds
-- AuditEvent, Subscription, Consent and the registered API clients.
CREATE DATABASE directory;
CREATE DATABASE referral;
CREATE DATABASE results_sharing;
CREATE DATABASE telemedicine;
CREATE DATABASE platform;
