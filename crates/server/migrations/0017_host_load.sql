-- How busy each host is, from its agent's reports (JSON of warren_protocol::HostLoad).
ALTER TABLE hosts ADD COLUMN load_report TEXT;
