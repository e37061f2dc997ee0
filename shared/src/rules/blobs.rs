//! Connected regions of a boolean grid. Written here rather than taken from `imageproc`
//! because the detector labels sparse masks over strips and sample lists, not whole images, and
//! needs only the members of each region.

/// Connected regions of `mask` (row-major, `w` wide), as lists of member indices.
/// `diagonal` selects 8-connectivity (else 4). Regions are ordered by their first member.
pub fn regions(mask: &[bool], w: usize, diagonal: bool) -> Vec<Vec<usize>> {
    let h = mask.len().checked_div(w).unwrap_or(0);
    let mut seen = vec![false; mask.len()];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
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
                    if mask[j] && !seen[j] {
                        seen[j] = true;
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
        assert_eq!(regions(&m, 3, true).len(), 1);
        assert_eq!(regions(&m, 3, false).len(), 3);
        assert_eq!(regions(&m, 3, true)[0].len(), 3);
        assert!(regions(&[], 0, true).is_empty());
    }
}
