-- A per-project secret for the git webhook (POST /api/v1/hooks/git/{project}?secret=...).
ALTER TABLE projects ADD COLUMN webhook_secret TEXT;
