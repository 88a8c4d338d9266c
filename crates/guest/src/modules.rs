//! Kernel modules on demand inside a VM. The host writes an index of every module of the guest
//! kernel into the initramfs (`m NAME PATH DEPS` and `a ALIAS NAME` lines, from each module's
//! `.modinfo`), and shares the module files at `/lib/modules/<release>`. The guest agent, run
//! as `modprobe` (the kernel's `/proc/sys/kernel/modprobe` points at a copy of it), loads what
//! the kernel or a program asks for — `fs-overlay` for a mount, `nft-chain-2-nat` for a rule —
//! with its dependencies first. The workspace's image needs no kmod.

use std::collections::HashMap;

/// One module: its file (relative to the release's folder) and the modules it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub path: String,
    pub depends: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Index {
    modules: HashMap<String, Module>,
    aliases: Vec<(String, String)>,
}

fn normal(name: &str) -> String {
    name.replace('-', "_")
}

/// `*` and `?` wildcards, as module aliases use them.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob_match(rest, &text[i..])),
        Some((b'?', rest)) => !text.is_empty() && glob_match(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && glob_match(rest, &text[1..]),
    }
}

impl Index {
    pub fn parse(text: &str) -> Self {
        let mut index = Self::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            match f.as_slice() {
                ["m", name, path, deps] => {
                    index.modules.insert(
                        normal(name),
                        Module {
                            path: (*path).to_owned(),
                            depends: deps
                                .split(',')
                                .filter(|d| !d.is_empty() && *d != "-")
                                .map(normal)
                                .collect(),
                        },
                    );
                }
                ["a", alias, name] => index.aliases.push(((*alias).to_owned(), normal(name))),
                _ => {}
            }
        }
        index
    }

    /// The module a name or alias means: the module of that name, else the first whose alias
    /// pattern matches.
    pub fn resolve(&self, wanted: &str) -> Option<String> {
        let name = normal(wanted);
        if self.modules.contains_key(&name) {
            return Some(name);
        }
        self.aliases
            .iter()
            .find(|(pattern, _)| glob_match(pattern.as_bytes(), wanted.as_bytes()))
            .map(|(_, name)| name.clone())
    }

    /// The files to load for `name`, dependencies first, each once.
    pub fn load_order(&self, name: &str) -> Vec<String> {
        fn visit(index: &Index, name: &str, out: &mut Vec<String>, seen: &mut Vec<String>) {
            if seen.iter().any(|s| s == name) || seen.len() > 256 {
                return;
            }
            seen.push(name.to_owned());
            let Some(module) = index.modules.get(name) else {
                return;
            };
            for dep in &module.depends {
                visit(index, dep, out, seen);
            }
            out.push(module.path.clone());
        }
        let mut out = Vec::new();
        visit(self, name, &mut out, &mut Vec::new());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = "# /lib/modules/6.1.0\n\
        m overlay kernel/fs/overlayfs/overlay.ko -\n\
        m nf_tables kernel/net/netfilter/nf_tables.ko nfnetlink,libcrc32c\n\
        m nfnetlink kernel/net/netfilter/nfnetlink.ko -\n\
        m libcrc32c kernel/lib/libcrc32c.ko -\n\
        m nft_chain_nat kernel/net/netfilter/nft_chain_nat.ko nf_tables,nf_nat\n\
        m nf_nat kernel/net/netfilter/nf_nat.ko nf_conntrack\n\
        m nf_conntrack kernel/net/netfilter/nf_conntrack.ko libcrc32c\n\
        a fs-overlay overlay\n\
        a nft-chain-2-nat nft_chain_nat\n\
        a pci:v00001AF4d00001041sv*sd*bc*sc*i* virtio_net\n";

    #[test]
    fn names_and_aliases_resolve_and_dependencies_load_first() {
        let index = Index::parse(INDEX);
        assert_eq!(index.resolve("overlay").as_deref(), Some("overlay"));
        assert_eq!(index.resolve("fs-overlay").as_deref(), Some("overlay"));
        assert_eq!(index.resolve("nf-tables").as_deref(), Some("nf_tables"));
        assert_eq!(
            index
                .resolve("pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00")
                .as_deref(),
            Some("virtio_net")
        );
        assert_eq!(index.resolve("no-such-thing"), None);
        assert_eq!(
            index.load_order("nft_chain_nat"),
            [
                "kernel/net/netfilter/nfnetlink.ko",
                "kernel/lib/libcrc32c.ko",
                "kernel/net/netfilter/nf_tables.ko",
                "kernel/net/netfilter/nf_conntrack.ko",
                "kernel/net/netfilter/nf_nat.ko",
                "kernel/net/netfilter/nft_chain_nat.ko",
            ]
        );
    }
}
