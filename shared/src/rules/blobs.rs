//! Connected regions of a boolean grid. Written here rather than taken from `imageproc`
//! because the detector labels sparse masks over strips and sample lists, not whole images, and
//! needs only the members of each region.

/// Connected regions of `mask` (row-major, `w` wide) that contain one of `seeds`, as lists of
/// member indices; `diagonal` selects 8-connectivity (else 4). The mask is consumed: members are
/// cleared as they are visited, so a sparse mask costs only its set cells, not its area.
pub fn regions(
    mask: &mut [bool],
    w: usize,
    seeds: impl IntoIterator<Item = usize>,
    diagonal: bool,
) -> Vec<Vec<usize>> {
    let h = mask.len().checked_div(w).unwrap_or(0);
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in seeds {
        if !mask.get(start).copied().unwrap_or(false) {
            continue;
        }
        mask[start] = false;
        stack.push(start);
        let mut members = Vec::new();
        while let Some(i) = stack.pop() {
            members.push(i);
            let (x, y) = ((i % w) as isize, (i / w) as isize);
            for dy in -1isize..=1 {
                for dx in -1isize..=1 {
                    if (dx == 0 && dy == 0) || (!diagonal && dx != 0 && dy != 0) {
                        continue;
                    }
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if mask[j] {
                        mask[j] = false;
                        stack.push(j);
                    }
                }
            }
        }
        out.push(members);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_and_eight_connectivity() {
        // 1 0 0
        // 0 1 0
        // 0 0 1   one region diagonally, three with 4-connectivity.
        let m = [true, false, false, false, true, false, false, false, true];
        assert_eq!(regions(&mut m.clone(), 3, 0..9, true).len(), 1);
        assert_eq!(regions(&mut m.clone(), 3, 0..9, false).len(), 3);
        assert_eq!(regions(&mut m.clone(), 3, 0..9, true)[0].len(), 3);
        // Only regions reached from a seed are returned.
        assert_eq!(regions(&mut m.clone(), 3, [8], false), vec![vec![8]]);
        assert!(regions(&mut [], 0, 0..0, true).is_empty());
    }
}
