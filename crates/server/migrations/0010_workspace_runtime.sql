-- How a workspace runs: `container` (a system container) or `vm` (a QEMU virtual machine).
ALTER TABLE workspaces ADD COLUMN runtime TEXT NOT NULL DEFAULT 'container';
-- KSM page merging for VM workspaces, per trust domain: on for a workspace when its owner's or
-- its project's flag is set (by an admin). Off by default: merged pages are a side channel
-- between the tenants whose memory is merged.
ALTER TABLE users ADD COLUMN vm_ksm BIGINT NOT NULL DEFAULT 0;
ALTER TABLE projects ADD COLUMN vm_ksm BIGINT NOT NULL DEFAULT 0;
