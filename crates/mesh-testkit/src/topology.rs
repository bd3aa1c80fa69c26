//! Graph shapes for test meshes.

use std::collections::{BTreeSet, VecDeque};

use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// How the nodes of a [`crate::TestNet`] are linked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// No links (nodes find each other some other way, e.g. discovery or peer exchange).
    None,
    /// 0 - 1 - 2 - ... - (n-1).
    Line,
    /// A line closed into a circle.
    Ring,
    /// Node 0 linked to every other node.
    Star,
    /// A connected random graph where every node has `degree` links.
    RandomRegular {
        /// Links per node (`n * degree` must be even and `degree < n`).
        degree: usize,
    },
    /// Exactly these links (node indexes).
    Custom(Vec<(usize, usize)>),
}

impl Topology {
    /// The links for `n` nodes, each as `(a, b)` with `a < b`, sorted. Random shapes use
    /// `seed` so a failing run can be repeated.
    pub fn edges(&self, n: usize, seed: u64) -> anyhow::Result<Vec<(usize, usize)>> {
        let mut edges: BTreeSet<(usize, usize)> = BTreeSet::new();
        match self {
            Topology::None => {}
            Topology::Line => edges.extend((1..n).map(|i| (i - 1, i))),
            Topology::Ring => {
                edges.extend((1..n).map(|i| (i - 1, i)));
                if n > 2 {
                    edges.insert((0, n - 1));
                }
            }
            Topology::Star => edges.extend((1..n).map(|i| (0, i))),
            Topology::RandomRegular { degree } => edges = random_regular(n, *degree, seed)?,
            Topology::Custom(list) => {
                for &(a, b) in list {
                    anyhow::ensure!(
                        a < n && b < n && a != b,
                        "bad custom edge ({a}, {b}) for {n} nodes"
                    );
                    edges.insert((a.min(b), a.max(b)));
                }
            }
        }
        Ok(edges.into_iter().collect())
    }
}

/// A connected random `degree`-regular graph (Steger-Wormald pairing with restarts).
fn random_regular(n: usize, degree: usize, seed: u64) -> anyhow::Result<BTreeSet<(usize, usize)>> {
    anyhow::ensure!(degree < n, "degree {degree} needs more than {n} nodes");
    anyhow::ensure!((n * degree).is_multiple_of(2), "n * degree must be even ({n} * {degree})");
    let mut rng = StdRng::seed_from_u64(seed);
    for _attempt in 0..1000 {
        let mut stubs: Vec<usize> = (0..n).flat_map(|v| std::iter::repeat_n(v, degree)).collect();
        let mut edges = BTreeSet::new();
        let mut stuck = false;
        while !stubs.is_empty() {
            let mut placed = false;
            for _try in 0..200 {
                let i = rng.gen_range(0..stubs.len());
                let j = rng.gen_range(0..stubs.len());
                let (u, v) = (stubs[i], stubs[j]);
                if i == j || u == v || edges.contains(&(u.min(v), u.max(v))) {
                    continue;
                }
                edges.insert((u.min(v), u.max(v)));
                stubs.swap_remove(i.max(j));
                stubs.swap_remove(i.min(j));
                placed = true;
                break;
            }
            if !placed {
                stuck = true;
                break;
            }
        }
        if !stuck && connected(n, &edges) {
            return Ok(edges);
        }
    }
    anyhow::bail!("no connected {degree}-regular graph on {n} nodes found")
}

/// `true` when every node can reach every other.
pub fn connected(n: usize, edges: &BTreeSet<(usize, usize)>) -> bool {
    if n == 0 {
        return true;
    }
    let mut adjacency = vec![Vec::new(); n];
    for &(a, b) in edges {
        adjacency[a].push(b);
        adjacency[b].push(a);
    }
    let mut seen = vec![false; n];
    let mut queue = VecDeque::from([0]);
    seen[0] = true;
    while let Some(v) = queue.pop_front() {
        for &w in &adjacency[v] {
            if !seen[w] {
                seen[w] = true;
                queue.push_back(w);
            }
        }
    }
    seen.into_iter().all(|s| s)
}

/// Hop distances from `from` to every node (`usize::MAX` when unreachable).
pub fn distances(n: usize, edges: &[(usize, usize)], from: usize) -> Vec<usize> {
    let mut adjacency = vec![Vec::new(); n];
    for &(a, b) in edges {
        adjacency[a].push(b);
        adjacency[b].push(a);
    }
    let mut dist = vec![usize::MAX; n];
    dist[from] = 0;
    let mut queue = VecDeque::from([from]);
    while let Some(v) = queue.pop_front() {
        for &w in &adjacency[v] {
            if dist[w] == usize::MAX {
                dist[w] = dist[v] + 1;
                queue.push_back(w);
            }
        }
    }
    dist
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(Topology::Line.edges(4, 0).unwrap(), vec![(0, 1), (1, 2), (2, 3)]);
        assert_eq!(Topology::Ring.edges(4, 0).unwrap(), vec![(0, 1), (0, 3), (1, 2), (2, 3)]);
        assert_eq!(Topology::Star.edges(3, 0).unwrap(), vec![(0, 1), (0, 2)]);
        assert!(Topology::Custom(vec![(0, 0)]).edges(2, 0).is_err());
    }

    #[test]
    fn random_regular_graphs_are_regular_simple_and_connected() {
        for (n, d) in [(50, 6), (100, 8), (20, 3), (300, 8)] {
            let edges = Topology::RandomRegular { degree: d }.edges(n, 7).unwrap();
            assert_eq!(edges.len(), n * d / 2);
            let mut deg = vec![0; n];
            for &(a, b) in &edges {
                assert!(a < b);
                deg[a] += 1;
                deg[b] += 1;
            }
            assert!(deg.iter().all(|&x| x == d));
            assert!(connected(n, &edges.iter().copied().collect()));
        }
        assert!(Topology::RandomRegular { degree: 3 }.edges(5, 0).is_err(), "odd n * degree");
    }

    #[test]
    fn distances_on_a_line() {
        let edges = Topology::Line.edges(5, 0).unwrap();
        assert_eq!(distances(5, &edges, 0), vec![0, 1, 2, 3, 4]);
    }
}
